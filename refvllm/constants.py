"""Sentinel token ids and placeholder strings shared by the processor and the model.

Placeholders are expanded by the processor into runs of *negative* sentinel ids. They never reach the LLM's
embedding table: the model replaces them with a valid id before the lookup and then scatters visual features
into those positions. So the LLM vocabulary and embedding matrix stay unchanged, and an exported adapter is a
plain PEFT adapter on the unmodified base model.
"""

VISUAL_TOKEN_ID = -200  # one position per video/image token (projector output row)
REGION_TOKEN_ID = -300  # one position per region token (region encoder output row)
IGNORE_INDEX = -100  # label value that the loss ignores

VIDEO_PLACEHOLDER = "<video>"
IMAGE_PLACEHOLDER = "<image>"
REGION_PLACEHOLDER = "<region>"
# Private-use character the processor builds its placeholder markers from: no turn text may contain it.
RESERVED_CHARACTER = "\ue000"

SAMPLE_KINDS = ("video_referring", "image_referring", "video", "image")
