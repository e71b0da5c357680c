"""Distillation by composition: a teacher, a critic, a student sampler and an evaluator.

    teachers.py   the frozen teacher: the analytic mixture or a finished score run
    students.py   how the generator samples (one step, K-step backward simulation, TDM segments) and
                  which training point each update differentiates
    critics.py    the student-side estimates: a learned fake score + discriminator (heads on the
                  fake score, on a separate trunk, or on the frozen teacher's features)
    losses.py     the pure f-distill pieces (density ratio, normalisations, DM and GAN losses)
    evaluation.py sample metrics of the student and the teacher, ratio quality, pictures

`fdistill.objectives.distill` assembles them into the 'distill', 'dmd2_multistep' and 'tdm'
objectives; each piece is tested on its own.
"""
