"""
experiments/pipeline.py: the parts on separate processes, one part per process, under torchrun.

Gradient isolation means a part needs nothing back from the parts after it. So process k owns part
k and trains it on its truncated objective L_k from what process k-1 sends it: h_{k-1} and the
earlier parts' constant terms. It sends its own detached output on before its backward pass, so
while process k works on batch t, process k-1 is already on batch t+1. Bytes are counted at every
send and every receive, by direction; nothing is ever sent backwards.

    torchrun --standalone --nproc_per_node 2 experiments/pipeline.py --parts 6,6 --dataset digits \
        --levels 3 --steps 4 --hidden 32 --image-size 8 --epochs 5 --warmup 50 --out runs/pipe

Every process holds the whole model (same seed, same init), but only its own part learns. At the
end of an epoch process 0 gathers the parts (weights, Adam state, update count), evaluates the model
and writes one checkpoint in glow_parts.py's format, so `python glow_parts.py --resume` continues it
in one process (with --finetune for the end-to-end epochs the pipeline cannot do). --resume here
continues it as a pipeline.
"""
import io
import os
import sys
import time
from dataclasses import replace

import torch

from common import gp


def train_pipeline(cfg, ckpt, rank, world, log):
    """Train part `rank` of cfg's model for cfg.epochs on its truncated objective (--mode parallel)."""
    import torch.distributed as dist
    run, (train_images, test_images) = gp.start_run(replace(cfg, out=None if rank else cfg.out), ckpt=ckpt)
    cfg, model, device, B = run.cfg, run.model, torch.device(run.cfg.device), run.cfg.batch_size
    part = model.parts[rank]
    # bytes [sent forward, sent backward, received from before, received from after], at every transfer
    traffic = torch.zeros(4, dtype=torch.float64, device=device)
    pending = []  # the sends in flight: their buffers stay alive until they are received

    def wait_for_sends():
        for request in pending:
            request.wait()
        pending.clear()

    def count(t, peer, sent):
        direction = (0 if peer > rank else 1) if sent else (2 if peer < rank else 3)
        traffic[direction] += t.numel() * t.element_size()

    def receive(batch):
        """Process 0 starts from a batch of images (no earlier terms); the others receive h_{k-1}, const."""
        if rank == 0:
            return gp.preprocess(batch.to(device), cfg.n_bits), torch.zeros(B, device=device)
        h = torch.empty(B, *model.parts[rank - 1].prior.mean.shape[1:], device=device)
        const = torch.empty(B, device=device)
        for t in (h, const):
            dist.recv(t, rank - 1)
            count(t, rank - 1, sent=False)
        return h.contiguous(memory_format=torch.channels_last), const

    part_out = [None]  # the part's outputs of the last forward pass: (h_k, zs, logdet, logp)
    part.register_forward_hook(lambda module, args, out: part_out.__setitem__(0, out))
    model.train()
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        loss_sum, n_bad = torch.zeros(world, dtype=torch.float64, device=device), torch.zeros(world, device=device)
        traffic.zero_()
        dist.barrier()
        t0 = time.perf_counter()
        steps = len(train_images) // B
        loader = [(None,)] * steps if rank else gp.batches(train_images, B, cfg.seed, epoch)
        for batch, in loader:
            h, const = receive(batch)
            loss = model.bits_per_dim(model.truncated(h, [rank], start=rank, const=const)[0]).mean()  # L_k
            wait_for_sends()  # the previous batch's sends, before this batch's go out
            out = part_out[0]  # what the part passed on: h_k, and with its own terms, the constants after it
            for t in (out[0], const + out[2] + out[3]) if rank + 1 < world else ():  # forward only
                t = t.detach().contiguous()
                count(t, rank + 1, sent=True)
                pending.append(dist.isend(t, rank + 1))
            if not torch.isfinite(loss):  # stop together at the epoch's end, not alone in the middle
                n_bad[rank] += 1
                continue
            model.zero_grad(set_to_none=True)
            loss.backward()
            gp.step_parts(run, [rank])  # the loop's step: this part's Adam at its warmed-up rate
            loss_sum[rank] += loss.item()
        wait_for_sends()
        dist.barrier()
        run.seconds += time.perf_counter() - t0
        run.steps += steps
        for t in (loss_sum, n_bad, traffic):
            dist.all_reduce(t)
        if n_bad.sum() > 0:
            raise gp.RunStopped(f"non-finite loss in part {int(torch.nonzero(n_bad)[0]) + 1} of {world} "
                                f"at epoch {epoch} (pipeline)")
        mine = io.BytesIO()  # process 0 gathers every part (weights, Adam state, update count)
        torch.save({"part": part.state_dict(), "optimizer": run.optimizers[rank].state_dict(),
                    "updates": run.updates[rank]}, mine)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine.getvalue(), gathered, dst=0)
        if rank == 0:
            for k, theirs in enumerate(gathered):
                theirs = torch.load(io.BytesIO(theirs), map_location=device, weights_only=True)
                model.parts[k].load_state_dict(theirs["part"])
                run.optimizers[k].load_state_dict(theirs["optimizer"])
                run.updates[k] = theirs["updates"]
            test = gp.evaluate_run(run, test_images)
            gp.finish_epoch(run, epoch, cfg.mode, (loss_sum / steps).tolist(), test, log)
            log(f"          pipeline: {int(traffic[0]):,} bytes sent forward between parts this epoch, "
                f"{int(traffic[1])} backward; received {int(traffic[2]):,} from earlier parts, "
                f"{int(traffic[3])} from later ones")
        dist.barrier()
    return run


def pipeline_run(ckpt):
    """A run the pipeline continues: --mode parallel, no finetuning, averaging, decay or clipping."""
    c = ckpt["config"]
    if c["mode"] != "parallel" or c["finetune"] or c["ema"] or c["decay"] or c["clip"]:
        raise gp.UsageError("--resume: the run in --out is not a pipeline's (--mode parallel, no finetuning, "
                            "averaging, decay or clipping): continue it with glow_parts.py --resume")


def run_pipeline(argv, where):
    rank, local_rank, world = gp.torchrun_env()
    log = print if rank == 0 else (lambda *a: None)
    p = gp.make_parser("The parts of Glow on separate processes (torchrun), one part per process.",
                       without=("mode", "finetune", "decay", "alternate_every", "clip", "ema"))
    p.add_argument("--resume", action="store_true", help="continue the pipeline's run in --out")
    args = p.parse_args(argv)
    args.mode = "parallel"
    cfg, ckpt = gp.config_from_args(args, log, check=pipeline_run)
    where["out"] = cfg.out
    if world != len(cfg.parts):
        raise gp.UsageError(f"the pipeline runs one part per process: {len(cfg.parts)} parts but {world} "
                            f"processes; use --nproc_per_node {len(cfg.parts)}")
    with gp.claim_run_dir(cfg.out, args.resume) if rank == 0 else open(os.devnull):  # before anyone waits
        cfg = gp.init_distributed(cfg, local_rank)
        try:
            train_pipeline(cfg, ckpt, rank, world, log)
        except RuntimeError as e:  # gloo / NCCL: a peer process died
            raise gp.RunStopped(f"process {rank}: a process of the pipeline was lost ({str(e).splitlines()[0]})") \
                from None


if __name__ == "__main__":
    sys.exit(gp.command("pipeline.py", run_pipeline))
