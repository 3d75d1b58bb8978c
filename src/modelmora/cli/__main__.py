"""``python -m modelmora.cli …``, the same as the ``modelmora`` command."""

from .commands import main

main()
