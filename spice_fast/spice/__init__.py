"""The SPICE algorithm: corpus, the challenger and reasoner roles (prompts, parsing), rewards.

See ../shared/SPICE.md. ``corpus`` yields documents; ``prompts`` builds both roles' prompts;
``parsing`` turns challenger output into a task or a counted invalid reason; ``rewards`` scores both
roles.
"""
