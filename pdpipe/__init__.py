"""pdpipe: LLM serving with prefill and decode disaggregated."""
__version__ = "0.1.0"

from pdpipe.messages import SamplingParams  # noqa: E402


def __getattr__(name):  # the engine pulls in torch: import it only when asked for
    if name == "LLM":
        from pdpipe.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams"]
