"""Times the health view's library call alone, in a fresh process; prints one JSON object.

``health.integration_cards`` over every integration of HERMES_INTEGRATIONS_FILE, against the
instance of DAGSTER_HOME, measured apart from the imports, the YAML and opening the instance (the
``status`` command pays those too; ``health_view.py`` times the command separately).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter


def main() -> int:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    import dagster as dg

    from hermes_orchestration.config import load_integrations
    from hermes_orchestration.health import integration_cards

    timings["imports"] = time.perf_counter() - started
    mark = time.perf_counter()
    integrations = load_integrations().integrations
    timings["load_yaml"] = time.perf_counter() - mark
    with dg.DagsterInstance.get() as instance:
        mark = time.perf_counter()
        cards = integration_cards(instance, integrations)
        timings["integration_cards"] = time.perf_counter() - mark
        mark = time.perf_counter()
        again = integration_cards(instance, integrations)
        timings["integration_cards_again"] = time.perf_counter() - mark
    assert len(again) == len(cards)
    json.dump(
        {
            "integrations": len(cards),
            "health": dict(Counter(card.health.value for card in cards)),
            "seconds": {name: round(value, 3) for name, value in timings.items()},
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
