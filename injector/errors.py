"""The project's own errors: one base, and the few kinds the shell must tell apart.

Every error the package raises on purpose derives from `InjectorError`, so the shell can catch
"ours" in one place and leave a real bug to surface as one. The kinds say what the caller should
do, not where the error came from:

- `InvalidInput`: the caller's input (a request, a manifest, an annotation, a certificate) cannot
  be used as it is. HTTP 4xx, or a one-line message and exit code 2. Retrying will not help.
- `ConfigError`: a setting, flag or file the operator gave is wrong: exit code 2 at start.
- `Unavailable`: something needed is out of reach right now (the Kubernetes API, say). HTTP 503
  with Retry-After; retrying later may succeed.
"""

from __future__ import annotations


class InjectorError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidInput(InjectorError, ValueError):
    """Input that cannot be used as it is; the caller's to fix."""


class ConfigError(InjectorError, ValueError):
    """A setting, flag or file that is wrong; the operator's to fix."""


class Unavailable(InjectorError):
    """Something needed is out of reach now; the same request may succeed later."""
