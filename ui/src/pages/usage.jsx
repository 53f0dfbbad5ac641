// Usage and invoices: this month's usage, invoice totals of the last
// months as SVG bars, and a month's invoice lines.
import { useEffect, useState } from 'preact/hooks';
import { api } from '../api.js';
import { useFetch } from '../live.js';
import { BarChart, ErrorText, Loading, Table } from '../components/ui.jsx';
import { fmtTime } from '../util.js';

function monthKey(d) { return `${d.getUTCFullYear()}-${String(d.getUTCMonth() + 1).padStart(2, '0')}`; }
function lastMonths(n) {
  const now = new Date();
  const out = [];
  for (let i = n - 1; i >= 0; i--) out.push(monthKey(new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() - i, 1))));
  return out;
}

export function UsagePage() {
  const months = lastMonths(6);
  const [month, setMonth] = useState(months[months.length - 1]);
  const usage = useFetch('/v1/usage');
  const invoice = useFetch(`/v1/invoices/${month}`);
  const [totals, setTotals] = useState(null);
  useEffect(() => {
    let alive = true;
    Promise.all(months.map((m) => api.get(`/v1/invoices/${m}`).then((inv) => ({ m, inv }), () => ({ m, inv: null }))))
      .then((r) => { if (alive) setTotals(r); });
    return () => { alive = false; };
  }, [api.project]);
  const currency = totals && (totals.find((t) => t.inv) || {}).inv ? totals.find((t) => t.inv).inv.currency : '';
  return (
    <section aria-labelledby="h-usage">
      <h1 id="h-usage">Usage</h1>
      {!totals ? <Loading what="invoices" /> : (
        <BarChart title={`Invoice totals by month${currency ? ` (${currency})` : ''}`}
          bars={totals.map((t) => ({ label: t.m.slice(2), value: t.inv ? Number(t.inv.total) || 0 : 0, text: t.inv ? t.inv.total : '–' }))} />
      )}
      <section aria-labelledby="h-cur-usage">
        <h2 id="h-cur-usage">This month so far</h2>
        <ErrorText error={usage.error} />
        {usage.data && (
          <>
            <p class="muted">{fmtTime(usage.data.from)} → {fmtTime(usage.data.to)}</p>
            <Table caption="Usage this month" head={['Meter', 'Type', 'Quantity', 'Unit']} testid="usage-table" empty={usage.data.lines.length ? null : 'Nothing used yet.'}>
              {usage.data.lines.map((l, i) => (
                <tr key={i}><td data-label="Meter">{l.meter}</td><td data-label="Type">{l.instance_type || (l.replicas ? `${l.replicas} replicas` : '–')}</td>
                  <td data-label="Quantity" class="num">{l.quantity}</td><td data-label="Unit">{l.unit}</td></tr>
              ))}
            </Table>
          </>
        )}
      </section>
      <section aria-labelledby="h-invoice">
        <div class="page-head">
          <h2 id="h-invoice">Invoice</h2>
          <label for="inv-month" class="sr-only">Month</label>
          <select id="inv-month" value={month} onChange={(e) => setMonth(e.currentTarget.value)} data-testid="invoice-month">
            {months.slice().reverse().map((m) => <option key={m} value={m}>{m}</option>)}
          </select>
        </div>
        <ErrorText error={invoice.error} />
        {invoice.data && (
          <>
            <p>{invoice.data.closed ? 'Final' : 'Estimate so far'} — total <strong>{invoice.data.total} {invoice.data.currency}</strong></p>
            <Table caption={`Invoice ${month}`} head={['Description', 'Quantity', 'Unit', 'Unit price', 'Amount']} testid="invoice-table"
              empty={invoice.data.lines.length ? null : 'No charges.'}>
              {invoice.data.lines.map((l, i) => (
                <tr key={i}><td data-label="Description">{l.description}</td><td data-label="Quantity" class="num">{l.quantity}</td>
                  <td data-label="Unit">{l.unit}</td><td data-label="Unit price" class="num">{l.unit_price}</td><td data-label="Amount" class="num">{l.amount}</td></tr>
              ))}
            </Table>
          </>
        )}
      </section>
    </section>
  );
}
