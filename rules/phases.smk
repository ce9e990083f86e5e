# One target rule per phase of the config (`phases:`): `snakemake PHASE` builds that phase's experiments
# and whatever they depend on.
for phase in PHASES:

    rule:
        name:
            phase
        input:
            phase_outputs(phase),
        localrule: True
