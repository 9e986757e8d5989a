"""certfx: a compiler for certified robustness of neural networks, on torch.fx.

Public API:

    >>> import torch, certfx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> cm = certfx.compile(net, domain="box", input_spec=certfx.LinfBall(eps=0.1),
    ...                     example_input=torch.zeros(1, 4))
    >>> cm.certified_forward(torch.full((2, 4), 0.5), y=torch.tensor([0, 1])).shape
    torch.Size([2, 2])
"""

from certfx.compile import CertifiedModule, compile
from certfx.domains import Interval, available_domains, get_domain
from certfx.errors import CertfxError
from certfx.frontends import load
from certfx.specs import Box, LinfBall, Margin

__all__ = [
    "load",
    "compile",
    "CertifiedModule",
    "LinfBall",
    "Box",
    "Margin",
    "Interval",
    "available_domains",
    "get_domain",
    "CertfxError",
]
__version__ = "0.1.0"
