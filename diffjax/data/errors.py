"""The exception the data package raises for problems a user can fix: missing, corrupt, unknown."""


class DatasetError(ValueError):
    """A dataset cannot be found, prepared or read; the message says what to do about it."""
