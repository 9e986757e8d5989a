"""Backends that consume canonical graphs outside the bound-propagation domains.

* :mod:`certfx.backends.milp`: exact mixed-integer linear encodings of ReLU networks (Tjeng,
  Xiao, Tedrake 2019) solved with OR-Tools, for complete verification and exact bounds.
"""

__all__: list[str] = []
