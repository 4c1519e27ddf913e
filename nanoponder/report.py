"""
Loss rows for people (one per way of computing the thoughts): a markdown table, and a plot of the loss and the
thoughts' convergence against Jacobi passes, exact thoughts as a line.

    from nanoponder.report import loss_table, plot_jacobi
    print(loss_table(rows)); plot_jacobi(rows, 'eval_jacobi.png', 'my model')
"""
import sys

from nanoponder.runtime import write_result


def fmt(value, spec='.4f'):
    return '-' if value is None else format(value, spec)


def loss_table(rows):
    lines = ['| thoughts | Jacobi passes | loss | ppl | bits/byte | change per pass | distance to exact |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        if r['thoughts'] == 'adaptive':
            what, passes = f"adaptive, tol {r['tol']:g}", f"{r['passes']:.2f} (max {r['max_passes']})"
        elif r['thoughts'] == 'exact':
            what, passes = 'exact (sequential, KV cache)', '-'
        else:
            what, passes = r['thoughts'], fmt(r['passes'], 'd')
        lines.append(f"| {what} | {passes} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{fmt(r.get('change'), '.2e')} | {fmt(r.get('distance_to_exact'), '.2e')} |")
    return '\n'.join(lines)


def plot_jacobi(rows, path, title):
    """Loss against Jacobi passes (exact as a line), and the convergence figures on a log scale."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("note: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
        return None
    jacobi = [r for r in rows if r['thoughts'] == 'jacobi']
    exact_rows = [r for r in rows if r['thoughts'] == 'exact']
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    passes = [r['passes'] for r in jacobi]
    left.plot(passes, [r['loss'] for r in jacobi], 'o-', label='Jacobi, R passes')
    if exact_rows:
        left.axhline(exact_rows[0]['loss'], color='k', linestyle='--', label='exact (sequential)')
    left.set(xlabel='Jacobi passes R', ylabel='loss (nats/token)', title='loss')
    left.legend()
    for key, label in (('change', '||z(r) - z(r-1)|| / ||z(r)||'), ('distance_to_exact', '||z(r) - z*|| / ||z*||')):
        points = [(r['passes'], r[key]) for r in jacobi if r.get(key)]  # zeros have no place on a log axis
        if points:
            right.semilogy(*zip(*points), 'o-', label=label)
    right.set(xlabel='Jacobi passes r', title='thoughts: change per pass, distance to exact')
    right.legend()
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    with write_result(path) as f:
        fig.savefig(f, format='png', dpi=100)
    plt.close(fig)
    return path
