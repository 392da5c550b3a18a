"""One tune: a session (prepare, search, finalize) over the stages of the pipeline, and what runs it."""
