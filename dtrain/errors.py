class UserError(Exception):
    """A problem the user can fix; main/predict print the message without a traceback."""
