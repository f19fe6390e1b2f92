"""Where an auto-plan engine's greedy tokens go wrong on the GPU (issue 22, open): tiny-llama built with
`--precision auto` (an FP8 lm_head), its greedy tokens from `LLM(engine)` with and without step graphs, from the
engine's program eagerly over whole prompts (lm_head at its tuned tactic), against transformers fp32; then the
FP8 linear's tactics alone against its reference at an lm_head's shape and 1-33 rows.

    python3 bench/auto_greedy_check.py notune      # or: tune (the build also tunes, as a GPU build does)
"""
import sys, torch, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from workbench.engine.build import BuildOptions, build_engine
from workbench import LLM, SamplingParams
from workbench.evaluate import paged_greedy
from workbench.models.intake import load_model, resolve_source
from workbench.runtime.executor import sampled_rows_program
t=time.time()
tune = sys.argv[1] == "tune"
build_engine("tiny-llama", "/tmp/dbg-auto", BuildOptions(precision="auto", tune=tune), workspace="/tmp/dbg.ws", log=lambda l: None)
print("built", time.time()-t, flush=True)
g=torch.Generator().manual_seed(0)
prompts=torch.randint(1,512,(4,12),generator=g).tolist()
hf=load_model(resolve_source("tiny-llama"),dtype=torch.float32, device="cuda").model
ref=[]
for ids in prompts:
    tt=torch.tensor([ids],device="cuda"); out=hf.generate(tt,attention_mask=torch.ones_like(tt),max_new_tokens=8,min_new_tokens=8,do_sample=False); ref.append(out[0,12:].tolist())
sp=SamplingParams(max_tokens=8,temperature=0,ignore_eos=True)
for cg in (True, False):
    llm=LLM("/tmp/dbg-auto", cuda_graphs=cg)
    outs=llm.generate(prompts,sp)
    print("graphs" if cg else "eager", [o.token_ids[:4] for o in outs], flush=True)
    prog=llm.runnable.program
print("ref   ", [r[:4] for r in ref])
print("full-row eager (tuned lm_head):", [paged_greedy(prog, torch.tensor(p), 4) for p in prompts])
rows=sampled_rows_program(prog)
print("lm_head impl full:", {n.name: prog.implementations(1)[n.name] for n in prog.graph.nodes if n.op.endswith('linear')}, flush=True)
print("lm_head impl rows:", {n.name: rows.implementations(1)[n.name] for n in rows.graph.nodes if n.op.endswith('linear')}, flush=True)
print("notes", prog.notes, rows.notes)
# the op alone
from workbench.kernels.gemm import quantize_fp8
from workbench.kernels.registry import REGISTRY
from workbench.kernels.autotune import tactic_ops; tactic_ops()
op=REGISTRY.get("workbench.fp8_linear")
w=torch.randn(512,64,device="cuda")
ws=w.abs().amax(1)/448
wq=quantize_fp8(w, ws[:,None])
xs=torch.tensor([0.02],device="cuda")
for M in (1,2,3,8,16,33):
    x=torch.randn(M,64,device="cuda",dtype=torch.bfloat16)
    xq=quantize_fp8(x, xs)
    ref_y=op.reference(xq, wq, ws, xs, None, torch.bfloat16)
    for name, fn in op.tactics.items():
        try:
            y=fn(xq, wq, ws, xs, None, torch.bfloat16)
            print(M, name, float((y.float()-ref_y.float()).norm()/ref_y.float().norm()))
        except Exception as e: print(M, name, "ERR", str(e)[:100])
