#!/bin/sh
# Build-time Postfix configuration for the compose demo: relay everything to
# mailpit, filter everything through bccguard (deploy/postfix after-queue files).
# CONF and SNIPPETS can be overridden (tests/test_deploy_manifests.py runs this
# on a temporary directory and reads the result back with postconf).
set -eu
conf=${CONF:-/etc/postfix}
snip=${SNIPPETS:-/usr/local/share/bccguard}
: > "$conf/main.cf"
[ -s "$conf/master.cf" ] || cp /usr/share/postfix/master.cf.dist "$conf/master.cf"
postconf -c "$conf" -e \
  "compatibility_level = 3.6" \
  "myhostname = postfix.docker" \
  "mydestination =" \
  "inet_interfaces = all" \
  "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8 172.16.0.0/12 192.168.0.0/16 10.0.0.0/8" \
  "relayhost = [mailpit]:1025" \
  "smtp_host_lookup = native" \
  "maillog_file = /dev/stdout" \
  "alias_maps =" "alias_database =" "local_recipient_maps ="
# The container is the isolation; chroot would need copies of /etc files in the queue.
postconf -c "$conf" -F '*/*/chroot = n'
# The shipped snippets, with compose host names: bccguard's service, and the
# re-injection smtpd listening on the container network (10026 is not published).
sed -e 's/\[127\.0\.0\.1\]:10025/[bccguard]:10025/' "$snip/main.cf.after-queue" >> "$conf/main.cf"
sed -e 's/^127\.0\.0\.1:10026 /10026 /' \
    -e 's#-o mynetworks=127\.0\.0\.0/8#-o mynetworks=127.0.0.0/8,172.16.0.0/12,192.168.0.0/16,10.0.0.0/8#' \
    "$snip/master.cf.after-queue" >> "$conf/master.cf"
