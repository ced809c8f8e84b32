"""smoothpurify: backdoor purification of trained neural networks.

The core is modality-agnostic: it knows tensors, ``nn.Module`` s and per-sample likelihoods,
never images, Prefect or DVC. Modalities plug in through :mod:`modalities.contract`.
"""

__version__ = "0.1.0"


class SmoothPurifyError(Exception):
    """An error caused by user input: the CLI prints its message as one line, no traceback.

    The message is always one line: a newline that came in with a user's path or value is shown
    escaped, never printed as a second line."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class NonFiniteLoss(SmoothPurifyError):
    """A tuning or defense loss became NaN or infinite: the run cannot go on (lower its learning
    rate). A pipeline may record the cell as diverged and go on with the others."""
