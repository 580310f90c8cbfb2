#!/usr/bin/env sh
# Throwaway TLS material for development, tests and a first compose run: a CA, a broker certificate
# (localhost, 127.0.0.1, mosquitto) and client certificates. Never use these in a plant.
# Usage: broker/make-dev-certs.sh DIR [CLIENT ...]   (default client: bridge)
set -eu
dir=${1:?usage: make-dev-certs.sh DIR [CLIENT ...]}
shift
[ "$#" -gt 0 ] || set -- bridge
mkdir -p "$dir"
cd "$dir"
days=30
openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=iotbridge dev CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
sign() {  # name subject extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
sign server "/CN=localhost" "subjectAltName=DNS:localhost,DNS:mosquitto,IP:127.0.0.1
extendedKeyUsage=serverAuth"
for client in "$@"; do
    sign "$client" "/CN=$client" "extendedKeyUsage=clientAuth"
done
chmod 600 ./*.key
echo "$dir: ca.crt server.crt/key $(printf '%s.crt/key ' "$@")"
