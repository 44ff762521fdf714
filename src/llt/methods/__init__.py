"""The methods, one module each, all stage machines over `llt.methods.base.Engine`:

    dense      dense class-incremental learning with lottery teaching (run.method=cil)
    topdown    Top-Down lifelong tickets (run.method=td)
    bottomup   Bottom-Up lifelong tickets (run.method=bu)
    retrain    re-training the masks of a ticket run in isolation: TR-BU and the lottery controls
    driver     `llt run`, `llt resume`, `llt eval`: config -> method -> summary
"""
