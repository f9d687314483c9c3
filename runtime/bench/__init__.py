"""qwen-local bench: speed and memory of the served GGUF against raw llama.cpp and the seed's path.

    qwen-local bench --model X.gguf [--model2 Y.gguf] [--baseline-base DIR --baseline-adapter DIR]
                     [--reps N] [--baseline-reps N] [--threads N] [--json OUT]
    qwen-local bench make-model --shape 3b --out DIR [--adapter-rank 16]
    qwen-local bench convert --base DIR --adapter DIR [--json OUT]        (see convert/bench.py)
    qwen-local bench soak --model X.gguf [--minutes 30] [--concurrency 8]  (see runtime/bench/soak_cli.py)
    qwen-local bench replicas --model X.gguf [--replicas 2] [--burst 64]   (see runtime/bench/replicas.py)

How it measures
- Every path runs in its own worker process (one per GGUF, one for the seed's transformers path), so
  load time, RSS and anonymous RSS belong to that path alone. The parent only orchestrates: it sends
  one request at a time, so two workloads never share the cores, and it alternates the paths request
  by request (and flips the order every round) so that drift on the machine hits all of them.
- Timings are taken inside the workers, around the call being measured.
- "raw llama.cpp" is the low-level API on a second context of the *same* loaded model, created with
  the engine's own context parameters: llama_decode of exactly the tokens the engine has to process
  (the uncached tail after the system prefix), and a greedy argmax decode loop. The ratio of the
  engine to it is the engine's overhead.
- The seed's path is transformers float32 + an unmerged PeftModel: generate(max_new_tokens=4) for an
  intent, 120 new tokens (min_new_tokens=120, greedy) for a reply, on the same prompt text.

Modules: cases (the prompts), stats (percentiles, ratios, targets), memory (/proc status), process
(worker processes and their pipe), workers (the measured paths), raw (raw llama.cpp), measure (the
interleaved run), report (the text table), cli (the command); soak, soak_server and soak_cli for
`bench soak`; replicas for `bench replicas`.
"""
