"""The evaluation stage: chatbot benchmarks as in the QLoRA paper (answers, an LLM judge in both orders, relative
scores, Elo and Bradley-Terry, also from judgments made elsewhere) and multiple-choice accuracy (MMLU-style)."""
