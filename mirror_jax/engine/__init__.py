"""The host side: everything that runs in Python between the jitted round functions.

* `placement`      - `Placement`: which device holds the target and which the draft; the only
                     cross-device transfers (`to_target` / `to_draft`, the token channel).
* `prefill`        - prompt validation and bucketing, the cache capacity, prefill, the first token.
* `autoregressive` - `generate_ar` / `decode_step`: the baseline.
* `speculative`    - `SpecSettings`, `TargetModel` / `DraftModel`, `SpecDecoder`: the sd and mirror
                     loops (one sync per round, EOS checked on every committed token).
* `stats`          - `RoundRecord`, `summarize`, the spec's modeled round time.
* `api`            - `generate(..., method="ar"|"sd"|"mirror")`: settings, validation, defaults.
"""
