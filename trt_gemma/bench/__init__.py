"""``trt-gemma bench``: offline throughput and latency of the engine, with peers and telemetry.

- ``workload.py``: the requests (synthetic lengths with a spread, or a JSONL dataset);
- ``target.py``: what runs them (a checkpoint or engine, or random weights at a preset's shapes);
- ``throughput.py`` / ``latency.py``: the two measurements, on one ``LLMEngine``;
- ``peers.py``: the same requests through transformers' ``generate`` (and llama.cpp if installed);
- ``telemetry.py``: GPU clocks, memory, power, temperature, utilisation sampled during a run;
- ``report.py``: the environment record, the JSON and the PNG plot;
- ``commands.py``: the argparse wiring that ``trt_gemma/cli.py`` registers.
"""
