"""The one exception type the pipeline raises for bad input or unreadable storage."""


class PipelineError(RuntimeError):
    """A pattern, URL, shard or option the pipeline cannot use; the message names it."""
