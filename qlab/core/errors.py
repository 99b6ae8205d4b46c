"""The one exception type users see."""


class QlabError(Exception):
    """A user-caused problem, stated in one sentence: what is wrong and what to do.

    The CLI prints it on one line and exits 2; pages show it with ``st.error``.
    Any other exception is a bug and keeps its traceback.
    """


class Cancelled(QlabError):
    """Long work stopped because the user asked; finished results are kept."""
