"""Torch modules per stage (temporary re-export; the modules move here from export/)."""

from ..export.modules import stage_module, stage_modules

__all__ = ["stage_module", "stage_modules"]
