"""The errors a user can cause, and how the command line ends on them."""


class UserError(Exception):
    """A mistake in a config, an override, a path or a URL: one line, exit status 2."""

    exit_code = 2


class StageRefused(UserError):
    """A stage cannot start yet (an earlier stage has no result, or it is stale)."""


class StageFailed(Exception):
    """A stage stopped because its trials keep failing with the same error: exit status 1."""

    exit_code = 1


class CheckFailed(Exception):
    """A pre-flight check of the model or data failed (seeds/003): exit status 3."""

    exit_code = 3
