"""Adapters served without merging: LoRA adapters chosen per request (``lora_slots.py``) and
prompt-learning prefixes placed in the KV cache (``virtual_tokens.py``)."""
