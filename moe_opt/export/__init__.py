"""Files for the engines: SGLang's and vLLM's tuned-config JSON, written from a tune or rebuilt from storage."""
