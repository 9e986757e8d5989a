"""Abstract domains: each file holds one domain's element type and rules.

Example:
    >>> from certfx.domains import available_domains
    >>> "box" in available_domains()
    True
"""

from certfx.domains.base import Domain, available_domains, get_domain, register_domain
from certfx.domains.interval import Interval

__all__ = ["Domain", "Interval", "available_domains", "get_domain", "register_domain"]
