"""A real DNS server on 127.0.0.1 (UDP) for the sending-domain check: TXT records from a dict,
every other name NXDOMAIN. `silent` drops queries unanswered (the resolver times out);
`refuse` answers REFUSED (no usable server)."""

import socket
import threading

import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class LocalDNS:
    def __init__(self, txt: dict[str, list[list[str]]] | None = None):
        # name → records, each record a list of strings (a long DKIM key comes in several)
        self.txt = {self._key(name): records for name, records in (txt or {}).items()}
        self.silent = False
        self.refuse = False
        self.queries: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)
        self._socket.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                wire, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            question = query.question[0]
            name = self._key(question.name.to_text())
            self.queries.append(name)
            if self.silent:
                continue
            response = dns.message.make_response(query)
            if self.refuse:
                response.set_rcode(dns.rcode.REFUSED)
            elif name not in self.txt:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT:
                rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.TXT)
                for strings in self.txt[name]:
                    quoted = " ".join('"' + s.replace('"', '\\"') + '"' for s in strings)
                    rrset.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, quoted))
                response.answer.append(rrset)
            self._socket.sendto(response.to_wire(), peer)
