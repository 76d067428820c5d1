"""Chatbot benchmark scoring (Vicuna / MT-bench style, as in the QLoRA paper) from judgments made elsewhere."""
