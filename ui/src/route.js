// Hash routing: #/instances, #/instances/NAME, #/instances/NAME/console ...
import { useEffect, useState } from 'preact/hooks';

export function parseHash(h = location.hash) {
  const path = h.replace(/^#\/?/, '').split('?')[0];
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { path: `/${parts.join('/')}`, parts };
}

export function useRoute() {
  const [route, setRoute] = useState(parseHash());
  useEffect(() => {
    const on = () => setRoute(parseHash());
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}

export function go(path) { location.hash = `#${path}`; }
export function href(...parts) { return `#/${parts.map(encodeURIComponent).join('/')}`; }
