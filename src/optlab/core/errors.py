"""The one exception type for mistakes a user can fix (bad params, bad data, bad files).

Stages and the optlab command catch :class:`OptlabError` (bad params are one:
``optlab.core.params.ParamsError``) at the top and exit 2 with the message alone; anything else
is a bug and keeps its traceback.
"""


class OptlabError(Exception):
    """A problem with the user's inputs; the message says what is wrong and how to fix it."""
