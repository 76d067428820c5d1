"""The data stage: read rows into conversations, render them with a template, tokenize with labels."""
