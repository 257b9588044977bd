"""Pure ASGI middleware for the data listener, one file each. The body-size limit is shared with the model
server and lives in ``serving/limits.py`` (re-exported here)."""

from serving.limits import BodyLimitMiddleware

__all__ = ["BodyLimitMiddleware"]
