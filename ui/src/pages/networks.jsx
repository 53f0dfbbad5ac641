// Networks: list, create, delete. (No events for networks: the list is
// loaded once and refreshed after this page's own changes.)
import { useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useFetch } from '../live.js';
import { useSession } from '../session.js';
import { ConfirmDialog, ErrorText, Field, FormDialog, Loading, Table } from '../components/ui.jsx';

export function NetworksPage() {
  const { perms } = useSession();
  const list = useFetch('/v1/networks');
  const [dialog, setDialog] = useState(null);
  const items = list.data || [];
  return (
    <section aria-labelledby="h-networks">
      <div class="page-head">
        <h1 id="h-networks">Networks</h1>
        {perms.canWrite && <button type="button" class="primary" onClick={() => setDialog({ kind: 'create' })} data-testid="create-network">Create network</button>}
      </div>
      <ErrorText error={list.error} />
      {!list.data && !list.error ? <Loading what="networks" /> : list.data && (
        <Table caption="Networks" head={['Name', 'Subnet', 'VNI', 'MTU', ...(perms.canWrite ? ['Actions'] : [])]} testid="networks-table"
          empty={items.length ? null : 'No networks yet (the default network is made on first use).'}>
          {items.map((n) => (
            <tr key={n.name} data-testid={`network-row-${n.name}`}>
              <td data-label="Name">{n.name}</td>
              <td data-label="Subnet">{n.subnet}</td>
              <td data-label="VNI">{n.vni}</td>
              <td data-label="MTU">{n.mtu}</td>
              {perms.canWrite && <td class="row-actions"><button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', n })}>Delete</button></td>}
            </tr>
          ))}
        </Table>
      )}
      {dialog && dialog.kind === 'create' && <CreateNetwork onClose={(ok) => { setDialog(null); if (ok) list.reload(); }} />}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete network ${dialog.n.name}?`} danger confirmLabel="Delete" message="Refused while instances use it."
          onConfirm={() => api.del(`/v1/networks/${enc(dialog.n.name)}`)}
          onClose={(ok) => { setDialog(null); if (ok) list.reload(); }} />
      )}
    </section>
  );
}

function CreateNetwork({ onClose }) {
  const [name, setName] = useState('');
  const [subnet, setSubnet] = useState('');
  return (
    <FormDialog title="Create network" submitLabel="Create" onClose={onClose}
      onSubmit={() => api.post('/v1/networks', { name: name.trim(), subnet: subnet.trim() || null })}>
      {(error) => (
        <>
          <Field label="Name" name="name" error={error}>{(id, a) => <input id={id} {...a} value={name} onInput={(e) => setName(e.currentTarget.value)} autocomplete="off" />}</Field>
          <Field label="Subnet (optional)" name="subnet" error={error} hint="e.g. 10.20.0.0/24; chosen for you when empty">
            {(id, a) => <input id={id} {...a} value={subnet} onInput={(e) => setSubnet(e.currentTarget.value)} autocomplete="off" />}
          </Field>
        </>
      )}
    </FormDialog>
  );
}
