"""The commands that ask the daemon and show its answer: status, devices, load, plan, unload."""

from __future__ import annotations

import argparse
import os

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifctl import render
from hsmdifctl.arguments import UsageError
from hsmdifctl.client import ping
from hsmdifctl.session import Session


def cmd_status(s: Session, args: argparse.Namespace) -> None:
    reply = ping(s.stub, s.path)
    if s.json:
        render.print_json(render.status_dict(reply), s.out)
    else:
        print(render.status_text(reply), file=s.out)


def cmd_devices(s: Session, args: argparse.Namespace) -> None:
    if args.priority or args.prioritize_by_memory:
        request = pb.SetPriorityRequest(
            devices=args.priority or [], by_memory=args.prioritize_by_memory
        )
        policy = s.call(s.stub.SetPriority, request)
        if not s.json:
            print(f"Policy version {policy.version}: {render.policy_text(policy)}", file=s.err)
    reply = s.call(s.stub.Devices, pb.DevicesRequest(refresh_speed=args.refresh_speed))
    if s.json:
        render.print_json([render.device_dict(d) for d in reply.devices], s.out)
    else:
        print(render.devices_text(list(reply.devices)), file=s.out)


def cmd_load(s: Session, args: argparse.Namespace) -> None:
    model = absolute(args.model)
    request = pb.LoadRequest(
        model_path=model,
        max_seq_len=args.max_seq_len,
        threads=args.threads,
        strategy=args.strategy,
        quantize=args.quantize,
    )
    progress = render.Progress("Loading")
    try:
        for event in s.events(s.stub.Load(request)):
            if event.HasField("progress"):
                if event.progress.note:
                    progress.clear()
                    print(event.progress.note, file=s.err)
                progress.update(event.progress.fraction, event.progress.stage)
            else:
                progress.clear()
                if s.json:
                    render.print_json(render.model_dict(event.loaded), s.out)
                else:
                    print(render.loaded_text(event.loaded), file=s.out)
    finally:
        progress.clear()


def absolute(model: str) -> str:
    """A relative path that exists here, made absolute: the daemon runs elsewhere."""
    if model and not os.path.isabs(model) and os.path.exists(model):
        return os.path.abspath(model)
    return model


def cmd_plan(s: Session, args: argparse.Namespace) -> None:
    if args.num_parameters and not args.quantize:
        raise UsageError("--num-parameters and --quantize go together")
    if args.num_parameters and args.model:
        raise UsageError("give a MODEL file or --num-parameters, not both")
    reply = s.call(
        s.stub.Plan,
        pb.PlanRequest(
            model_path=absolute(args.model),
            max_seq_len=args.max_seq_len,
            strategy=args.strategy,
            num_parameters=args.num_parameters,
            quantize=args.quantize,
        ),
    )
    if s.json:
        render.print_json(render.plan_dict(reply), s.out)
    else:
        print(render.plan_text(reply), file=s.out)


def cmd_unload(s: Session, args: argparse.Namespace) -> None:
    reply = s.call(s.stub.Unload, pb.UnloadRequest())
    if s.json:
        render.print_json({"unloaded": reply.was_loaded}, s.out)
    else:
        print("Unloaded the model" if reply.was_loaded else "No model was loaded", file=s.out)
