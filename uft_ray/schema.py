"""Column names and Arrow schemas shared by the data plane, the reference service and the trainer.

docs/design.md "Unified rows and tokenization". One place, so that a renamed column breaks loudly.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# After normalize: the unified row.
UNIFIED = pa.schema(
    [
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("response", pa.string()),
        ("rejected", pa.string()),  # null unless kind == pair
        ("score", pa.float32()),
    ]
)

# After tokenize: input_ids = rendered prompt (with generation prompt) + response + EOS.
# Only tokens at positions >= response_start carry loss. For pairs the rejected side shares the prompt.
TOKENIZED = pa.schema(
    list(UNIFIED)
    + [
        ("input_ids", pa.list_(pa.int32())),
        ("response_start", pa.int32()),
        ("length", pa.int32()),
        ("rejected_input_ids", pa.list_(pa.int32())),  # null unless kind == pair
        ("rejected_response_start", pa.int32()),
        ("rejected_length", pa.int32()),
    ]
)

# Written by the reference service (float64: summed log-probs over 2k tokens need the mantissa).
REF_LOGP = "ref_logp"
REF_LOGP_REJECTED = "ref_logp_rejected"
REFERENCE = pa.schema([("row_id", pa.string()), (REF_LOGP, pa.float64()), (REF_LOGP_REJECTED, pa.float64())])

# Rejected rows, with why. `raw` is the row as read (JSON text), so nothing is lost.
QUARANTINE = pa.schema(
    [("reason", pa.string()), ("source", pa.string()), ("detail", pa.string()), ("raw", pa.string())]
)
