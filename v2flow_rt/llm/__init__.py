"""The LLM side of V2Flow: the vocabulary embedding table visual tokens live in, and the base LM."""
