"""Hatch build hook: editable installs also get the lm-eval startup hook (.pth) at site-packages root."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if version == "editable":
            build_data["force_include_editable"]["sdtp_eval/sdtp_lm_eval_hook.pth"] = "sdtp_lm_eval_hook.pth"
