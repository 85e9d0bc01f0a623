"""The parts of train.py that are not the training loop itself."""


class UserError(Exception):
    """A problem with the command line or the run folder: reported in one line, no traceback."""
