"""Request errors: what a request did wrong, carried to the wire as a gRPC status.

Every front end maps a :class:`RequestError` onto their status.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that cannot be served; becomes a gRPC status with this message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)

