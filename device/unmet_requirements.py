"""The requirements of the packages installed in a folder that nothing importable meets, one a line.

    PYTHONPATH=SITE python3 -m device.unmet_requirements SITE

Run by device/pipeline.py after installing the carried wheels into SITE (pip --no-deps): it records which of
their needs the lent machine's own packages do not meet, so that a failure later reads as what it is.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import Requirement


def unmet(site: str) -> list[str]:
    found = set()
    for dist in md.distributions(path=[site]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or one for another platform
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                found.add(f"{dist.metadata['Name']} needs {req}: missing")
                continue
            if not req.specifier.contains(version, prereleases=True):
                found.add(f"{dist.metadata['Name']} needs {req}: {version} is there")
    return sorted(found)


if __name__ == "__main__":
    print("\n".join(unmet(sys.argv[1])))
