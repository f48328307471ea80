"""Web-data curation (paper §3.1) as datatrove pipeline steps.

A recipe (herd.config.curate) names the steps in order; `herd.curate.pipeline` turns it into
datatrove executor runs. Steps that look at one document at a time run inside a stage; steps
that need the whole corpus first (URL, MinHash and line dedup, the KL filter) split the
pipeline: every task records what it saw (`Collect`), one task decides (`Decide`), and the next
stage applies the decision (`Apply`), so the result does not depend on how the data was split
over tasks.

    read.py      WARC (surviving truncated files), HTML folders; JSONL/Parquet from datatrove
    safety.py    domain blocklist (subdomains match), PII masking
    extract.py   HTML -> plain text: main content, code lines, math as TeX, image alt text
    dedup.py     URL (newest crawl wins), MinHash, ccNet line dedup
    filters.py   n-gram repetition (Rae et al.), dirty-word count and ratio, token KL divergence
    language.py  language id (py3langid) with per-language confidence thresholds
    pipeline.py  recipe -> stages -> executors; per-step stats
"""
