"""The lab: experiments that test, with numbers, the claims of Ba, Kiros & Hinton (2016).

``lnorm lab list | run | report`` (see ``lnorm.lab.cli``); experiments in
``lnorm.lab.experiments`` (that package's docstring says how to add one).
"""
