"""A VLM judge of base vs finetuned images: the paper's GPT-4V study (seed paper, Table 2)."""
