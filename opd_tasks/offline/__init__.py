"""Offline data: an existing dataset (or teacher-generated rollouts) -> scored shards -> kept rows.

    score_offline(cfg, "data/responses.parquet", "runs/x")      # `opd score`: -> runs/x/offline/scored/
    score_offline(cfg, "data/responses.jsonl", "scored/")        # -> scored/ (a plain directory)

The offline phase of a run (flows/offline.py), each step a stage under RUN/offline/ with a manifest,
one module per step:
    dataset.import_dataset(ctx)        offline.dataset -> offline/rollout (source: dataset)
    generate.run_offline_generation    teachers sample into offline/rollout (source: generate; also
                                       `opd generate` via generate.generate_offline)
    scoring.run_offline_scoring(ctx)   offline/rollout -> offline/scored (every teacher + the combination)
    filter.run_offline_filter(ctx)     offline/scored -> offline/filter/decisions.json: kept or dropped + why
    (the trainer, iteration -1)        kept rows -> sft -> checkpoints/offline (iteration 0's student)
    evaluate.run_offline_evaluation    greedy accuracy of the warm-started student -> offline/evaluation
score.score_offline is `opd score`: a dataset scored outside the offline phase. view.filter_report is
the filter's part of `opd inspect --offline`.

Input columns (dataset.to_rollout_table): either token ids (`prompt_ids`, `response_ids`) or texts
(`prompt`, `response`), plus optional `sample_id`, `prompt_id`, `domain`, `reward`, `answer` (a
reward from the domain verifier when `reward` is absent). Texts are tokenized once with the
student's tokenizer (the response without special tokens, then EOS appended) and the ids are what
is stored and scored, so the shard says exactly what was scored. behaviour_logp stays null: nobody
sampled these responses from the student.
"""
