"""``trt-gemma bench``: throughput and latency of the engine (with peers and telemetry), the
serving sweep against any OpenAI-compatible URL, and the one-command GPU suite.

- ``workload.py``: the requests (synthetic lengths with a spread, or a JSONL dataset);
- ``target.py``: what runs them (a checkpoint or engine, or random weights at a preset's shapes);
- ``throughput.py`` / ``latency.py``: the two measurements, on one ``LLMEngine``;
- ``peers.py``: the same requests through transformers' ``generate`` (and llama.cpp if installed);
- ``telemetry.py``: GPU clocks, memory, power, temperature, utilisation sampled during a run;
- ``report.py``: the environment record, the JSON and the PNG plot;
- ``serve.py``: ``bench serve``, the online sweep (concurrency or request rate, goodput);
- ``gpu_suite.py``: ``bench gpu-suite``, every GPU measurement in order within a time budget;
- ``commands.py``: the argparse wiring that ``trt_gemma/cli.py`` registers.
"""
