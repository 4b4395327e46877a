"""CogAlign core: pipeline stage logic, free of orchestration (no Prefect, no DVC imports).

Each stage is a plain function over files in a workspace; ``python -m cogalign_core.stage NAME``
is the command DVC runs. Data stages never import torch or transformers.
"""

__version__ = "0.1.0"
