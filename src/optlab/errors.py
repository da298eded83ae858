"""The one exception type for mistakes a user can fix (bad params, bad data, bad files).

Stages catch :class:`OptlabError` (and :class:`optlab.params.ParamsError`) at the top and exit
non-zero with the message alone; anything else is a bug and keeps its traceback.
"""


class OptlabError(Exception):
    """A problem with the user's inputs; the message says what is wrong and how to fix it."""
