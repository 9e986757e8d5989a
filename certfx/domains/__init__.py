"""Abstract domains: each file holds one domain's element type and rules.

Example:
    >>> from certfx.domains import available_domains
    >>> "box" in available_domains() and "deepz" in available_domains()
    True
"""

from certfx.domains.base import Domain, available_domains, get_domain, register_domain
from certfx.domains.interval import Interval
from certfx.domains.zonotope import Zonotope, ZonotopeOptions

__all__ = ["Domain", "Interval", "Zonotope", "ZonotopeOptions", "available_domains",
           "get_domain", "register_domain"]
