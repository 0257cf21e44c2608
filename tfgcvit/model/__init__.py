"""The network: its layers (`layers`), the graph builder and Keras Applications API (`gcvit`),
and which form of a layer runs for the target it is traced for (`forms`).

`from tfgcvit.model import GCViTTiny` names what `tfgcvit.model.gcvit` defines; that
module is loaded on first use, so importing `tfgcvit.model.layers` (as the weight
mapping does) does not load the Applications API above it.
"""

import importlib

_MODULES = ("layers", "forms", "gcvit")


def __getattr__(name):
    # `from tfgcvit.model import forms` asks for the attribute before importing the submodule:
    # answer it with the submodule, not with a name of gcvit (which would import the layers).
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.gcvit"), name)
