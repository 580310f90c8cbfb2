"""A simulator child process: one engine, driven by its parent over stdin/stdout (see runner)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

from config.settings import Settings
from observability.logs import setup_logging
from simulators.engine import ShardSpec
from simulators.runner import make_engine
from simulators.scenario import Event


def main() -> None:
    init = json.loads(sys.stdin.readline())
    settings = Settings.model_validate(init["settings"])
    setup_logging(init.get("log_level", "INFO"), init.get("log_format", "text"))
    out = sys.stdout
    lock = threading.Lock()

    def emit(message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with lock:
            out.write(line + "\n")
            out.flush()

    events = [Event(**e) for e in init["events"]]
    engine = make_engine(settings, ShardSpec(**init["spec"]), events, emit)

    def commands() -> None:
        for line in sys.stdin:
            word, _, argument = line.strip().partition(" ")
            if word == "start":
                engine.start(float(argument))
            elif word == "stop":
                engine.stop()
        engine.stop()  # stdin closed: the parent is gone

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    threading.Thread(target=commands, name="commands", daemon=True).start()
    engine.run()


if __name__ == "__main__":
    main()
